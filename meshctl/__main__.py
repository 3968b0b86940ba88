"""`python -m meshctl`: the same CLI as the meshctl console script."""

from meshctl.cli import main

main()
