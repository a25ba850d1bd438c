"""Test-wide setup: never reach the Hugging Face Hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
