from csx_conferences.app import main

if __name__ == "__main__":
    main()
