"""The local web page (`python app.py`): photos and masks, training runs, results. See docs/app.md."""
