from swarm._cli import main

main()
