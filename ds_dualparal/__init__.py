"""DualParal: block-wise, pipeline-parallel long-video generation with Wan DiTs on DeepSpeed."""
