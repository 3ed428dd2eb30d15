import os
import tempfile

# transformers copies remote code into HF_MODULES_CACHE (default ~/.cache/huggingface/modules), keyed
# by the folder's base name: give this test session a private one before transformers is imported.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
