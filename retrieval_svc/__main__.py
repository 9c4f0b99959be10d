from retrieval_svc.server import main

main()
