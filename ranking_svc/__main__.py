from ranking_svc.server import main

main()
