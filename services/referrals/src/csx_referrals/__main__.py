from csx_referrals.app import main

if __name__ == "__main__":
    main()
