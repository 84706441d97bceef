from csx_actionplans.app import main

if __name__ == "__main__":
    main()
