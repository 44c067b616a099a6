from setuptools import find_packages, setup

setup(
    name="ds_dualparal",
    version="0.1.0",
    description="DualParal long-video generation with Wan DiTs as a DeepSpeed pipeline",
    packages=find_packages(include=["ds_dualparal", "ds_dualparal.*"]),
    package_data={"ds_dualparal": ["assets/tiny-wan/**/*", "assets/tiny-wan/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.17",
        "transformers>=4.50",
        "diffusers>=0.35",
        "accelerate",
        "safetensors",
        "einops",
        "numpy",
        "imageio",
        "imageio-ffmpeg",
        "tqdm",
        "pydantic>=2",
        "ftfy",
    ],
    extras_require={"test": ["pytest", "hypothesis", "peft>=0.17"]},
)
