from kmsguard.cli.main import main

main()
