from failfirst.cli import main

main()
