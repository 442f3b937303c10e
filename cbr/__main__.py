from cbr.cli import main

main()
