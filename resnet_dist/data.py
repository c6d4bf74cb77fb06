"""The public data API of resnet_dist, re-exported from the modules that implement it.

    resnet_dist.arrays        ImageArrays, DataError, the stratified train/val split
    resnet_dist.sources       load_source: image folders, tar archives (and, through
    resnet_dist.cifar_pickle, torchvision's pickled CIFAR-10 batches, restricted unpickler)
    resnet_dist.parquet       the on-disk format: manifest.json + fixed_size_binary Parquet
                              shards; read_manifest, read_split, split_files, decode_images
    resnet_dist.prepare       prepare_dataset / ensure_prepared: source -> Parquet, atomically

Code may import from here or from those modules; the names below are the stable ones.
"""

from resnet_dist.arrays import DataError, ImageArrays, holdout_size, stratified_split
from resnet_dist.parquet import FORMAT_VERSION, MANIFEST_NAME, OUTPUT_SPLITS
from resnet_dist.parquet import decode_images, encode_images, is_prepared, read_manifest, read_split, split_files
from resnet_dist.prepare import ensure_prepared, prepare_dataset
from resnet_dist.sources import ARCHIVE_SUFFIXES, IMAGE_SUFFIXES, SOURCE_SPLITS, load_source

__all__ = [
    "ARCHIVE_SUFFIXES", "DataError", "FORMAT_VERSION", "IMAGE_SUFFIXES", "ImageArrays", "MANIFEST_NAME",
    "OUTPUT_SPLITS", "SOURCE_SPLITS", "decode_images", "encode_images", "ensure_prepared", "holdout_size",
    "is_prepared", "load_source", "prepare_dataset", "read_manifest", "read_split", "split_files",
    "stratified_split",
]
