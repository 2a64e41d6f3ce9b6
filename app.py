"""Entry point of the Gradio app: ``python app.py [--model ID] [--port N]``."""

import sys

from attnedit.surfaces.webapp import main

if __name__ == "__main__":
    sys.exit(main())
