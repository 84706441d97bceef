"""The referrals composition root: everything is built here from settings, nothing at import."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from csx.referrals.v1 import referrals_pb2, referrals_pb2_grpc
from csx_common.intake import EnvelopeOpener, IntakeConsumer, load_intake_key
from csx_common.runtime import setup_process
from csx_common.sensitivity import registry
from csx_common.settings import load_settings
from csx_referrals import tables
from csx_referrals.cases import Cases
from csx_referrals.consumers import conferences_consumer
from csx_referrals.erasure import ErasureService
from csx_referrals.grpc_api import ReferralsApi
from csx_referrals.intake import INTAKE_DURABLE, ConcernIntake
from csx_referrals.repository import ReferralsRepository
from csx_referrals.service import ReferralsService
from csx_referrals.settings import ReferralsSettings
from csx_safeguarding.disclosure import Discloser
from csx_safeguarding.runtime import SafeguardingRuntime

SERVICE = "referrals"
MIGRATIONS = Path(__file__).parent / "migrations"


class ReferralsRuntime(SafeguardingRuntime):
    """The service runtime, plus the sealed-intake consumer once NATS is up (stopped at shutdown,
    before NATS is drained)."""

    intake: IntakeConsumer | None = None
    intake_opener: EnvelopeOpener | None = None
    concern_intake: ConcernIntake | None = None

    def enable_intake(self, opener: EnvelopeOpener, concerns: ConcernIntake) -> None:
        self.intake_opener, self.concern_intake = opener, concerns

    async def prepare(self) -> None:
        await super().prepare()
        if self.intake_opener is None or self.concern_intake is None:
            return
        assert self.nc is not None and self.js is not None
        self.intake = IntakeConsumer(
            self.nc,
            self.js,
            self.intake_opener,
            self.concern_intake.accept,
            durable=INTAKE_DURABLE,
            replicas=self.settings.stream_replicas,
            max_age_days=self.settings.stream_max_age_days,
        )
        await self.intake.start()
        self.on_close(self.intake.stop)


def build(settings: ReferralsSettings) -> ReferralsRuntime:
    runtime = ReferralsRuntime(
        SERVICE, settings, metadata=tables.metadata, delivery=tables.delivery, migrations=MIGRATIONS
    )
    repo = ReferralsRepository(runtime.sealer, runtime.keyring.blind_index_key)
    audit = runtime.audit_log(tables.audit)
    units = runtime.units
    cases = Cases()
    # The one policy decides every read (through the discloser) and who may run each command.
    service = ReferralsService(
        units, repo, Discloser(runtime.policy, registry(), audit), policy=runtime.policy, cases=cases
    )
    erasure = ErasureService(
        units, repo, audit, retention_years=settings.retention_years, policy=runtime.policy, cases=cases
    )
    runtime.add_grpc(
        referrals_pb2_grpc.add_ReferralsServiceServicer_to_server,
        ReferralsApi(service, erasure),
        referrals_pb2.DESCRIPTOR.services_by_name["ReferralsService"].full_name,
    )
    # Referrals is the front door: it serves concerns before conferences (whose stream this follows)
    # has ever run, so it does not wait for that stream to start (docs/adr/0014).
    runtime.add_consumer(conferences_consumer(cases), in_background=True)
    if settings.intake_key_file:
        opener = EnvelopeOpener(
            Path(settings.tls_ca_file).read_bytes(),
            [load_intake_key(settings.intake_key_file)],
            max_age=timedelta(seconds=settings.intake_max_age_seconds),
            skew=timedelta(seconds=settings.intake_clock_skew_seconds),
        )
        runtime.enable_intake(opener, ConcernIntake(units, tables.delivery.inbox, service))
    return runtime


async def serve(settings: ReferralsSettings) -> None:
    # Built inside the running loop: grpc.aio binds its server to the loop that creates it.
    await build(settings).run()


def main() -> None:
    settings = load_settings(ReferralsSettings)
    setup_process(SERVICE, settings)
    asyncio.run(serve(settings))
