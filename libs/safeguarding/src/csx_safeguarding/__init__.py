"""The safeguarding kernel every service shares: who may see what (the policy and the disclosure
point), each service's view of consent and sharing decisions, erasure of a child, and the working-day
calendar of the process's time limits. Domain, not mechanism: it builds on csx_common and reads the
safeguarding contract (csx.safeguarding.v1), never a service's."""
