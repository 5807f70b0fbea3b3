from fusekit.cli import main

main()
