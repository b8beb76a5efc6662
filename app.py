"""The attrclf web app (also the Hugging Face Space): `python app.py [--model DIR_OR_HUB_ID] [--host H] [--port P]`.

Wiring only: settings from flags and environment (ATTRCLF_MODEL, GRADIO_SERVER_NAME, GRADIO_SERVER_PORT), the model
loaded once, a module-level `demo`. See attrclf/ui.py.
"""

import sys

from attrclf.ui import AppSettings, build_demo, launch, load_predictor

settings = AppSettings.parse(sys.argv[1:] if __name__ == "__main__" else None)
predictor, status = load_predictor(settings.model, settings.threads)
print(status, flush=True)
demo = build_demo(predictor, settings.model, status, settings.examples)

if __name__ == "__main__":
    launch(demo, settings)
