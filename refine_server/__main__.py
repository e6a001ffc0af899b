from refine_server.cli import main

main()
