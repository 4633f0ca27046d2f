from reliable_msg.tools.cli import main

main()
