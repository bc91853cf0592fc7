from lmtp_gateway.cli import main

main()
