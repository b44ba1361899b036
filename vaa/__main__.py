from vaa.cli import main

main()
