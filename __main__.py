from shrink.cli.app import main

main()
