from csx_panel.app import main

if __name__ == "__main__":
    main()
