"""``python -m eggroll_ft.replay BASE LOG --step K --output_dir DIR`` (``rebuild.main``)."""
from .rebuild import main

main()
