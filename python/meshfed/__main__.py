from meshfed.cli import main

main()
