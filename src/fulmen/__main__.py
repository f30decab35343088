from fulmen.cli import main

main()
