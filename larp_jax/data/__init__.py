"""Input pipeline: synthetic, TFDS, video-folder and TFRecord sources behind one `get_dataset`.

    cfg = data.default_config()
    it = data.get_dataset(cfg, 'train', video_shape=(16, 128, 128), batch_size=16, seed=0)
    batch = next(it)  # {'video': f32 [16, 16, 128, 128, 3], 'label': i32 [16], 'clip_id': i32 [16]}
    global_batch = data.make_global_batch(batch, mesh, sharding)

See README.md in this folder for the sources, the clip protocol and the resume guarantee.
"""
from larp_jax.data.config import default_config
from larp_jax.data.pipeline import DataIterator
from larp_jax.data.pipeline import get_dataset
from larp_jax.data.pipeline import make_global_batch
from larp_jax.data.pipeline import num_skipped
