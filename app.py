"""The local web page: `python app.py [--host 127.0.0.1] [--port 7860] [--data-dir data] [--output-dir out]`.

Photos, training and results in a browser (see docs/app.md). It listens on 127.0.0.1 only unless --host
says otherwise; paths typed into the page must lie in the data, output or models folders.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="MagiCapture's local web page: photos, training, results.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--data-dir", default="data", help="photos, prepared folders, the demo model (default data)")
    p.add_argument("--output-dir", default="out", help="training runs, one folder each (default out)")
    p.add_argument("--models-dir", default="models", help="base models and identity networks, read only (default models)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from library.app.page import HEAD, build_page
    from library.app.state import Sandbox

    try:
        sandbox = Sandbox.make(args.data_dir, args.output_dir, args.models_dir)
    except OSError as err:
        print(f"error: cannot create {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    data, out = sandbox.writable
    page = build_page(sandbox, data, out)
    # the data folder (models under it too) holds the pictures the page shows; nothing else is served
    page.queue().launch(server_name=args.host, server_port=args.port, allowed_paths=[str(r) for r in sandbox.readable],
                        show_error=False, inbrowser=False, head=HEAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
