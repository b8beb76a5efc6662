"""The attrclf web app (also the Hugging Face Space): `python app.py [--model DIR_OR_HUB_ID] [--host H] [--port P]`.

Wiring only: settings from flags and environment (ATTRCLF_MODEL, GRADIO_SERVER_NAME, GRADIO_SERVER_PORT), the model
loaded once (in a background thread that imports torch while gradio imports), a module-level `demo` (as a Space
needs). `attrclf app` runs the same. See attrclf/serving.py and attrclf/ui.py.
"""

import sys

from attrclf.serving import AppSettings, ModelLoader

settings = AppSettings.parse(sys.argv[1:] if __name__ == "__main__" else None)
loader = ModelLoader(settings.model, settings.threads)

from attrclf.ui import build_app, launch  # noqa: E402 (gradio imports while the loader imports torch)

demo = build_app(settings, loader)

if __name__ == "__main__":
    launch(demo, settings)
