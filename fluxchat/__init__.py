"""fluxchat: raw text in, a chat model out, on the Hugging Face stack. The library under pipeline/ (commands), tokenizer/train.py and app.py."""
