"""What hf_pipe does for the libraries around transformers: PEFT adapters (`peft.py`), TRL's trainers (`hf_pipe.trl`)."""
