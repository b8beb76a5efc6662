"""The attrclf web app (also the Hugging Face Space): `python app.py [--model DIR_OR_HUB_ID] [--host H] [--port P]`.

Wiring only: settings from flags and environment (ATTRCLF_MODEL, GRADIO_SERVER_NAME, GRADIO_SERVER_PORT), the model
loaded once, a module-level `demo` (as a Space needs). `attrclf app` runs the same. See attrclf/ui.py.
"""

import sys

from attrclf.ui import AppSettings, build_app, launch

settings = AppSettings.parse(sys.argv[1:] if __name__ == "__main__" else None)
demo = build_app(settings)

if __name__ == "__main__":
    launch(demo, settings)
