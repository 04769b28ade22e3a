"""Training augmentation whose randomness is a function of the run's seed and the data.

FFCV's ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from numba's
per-thread generators, which nobody seeds: two runs of one seed crop and flip every image
differently. ``we-dist compare`` pairs runs by seed (same initial weights, same sample
order), so unseeded augmentation would add noise to every paired difference that no
method caused.

:class:`SeededCropFlipDecoder` does the same random-resized crop (FFCV's own
``get_random_crop``: scale and aspect-ratio ranges as in torchvision) and, optionally, the
horizontal flip, in one decoding pass, and draws both from a generator seeded per sample
with ``(seed, the sample's index, the sample indices of its batch)``. The batch's indices
change with every epoch's order (a function of seed and epoch only), so a sample gets a
new crop every epoch, and the same crop in every run of the same seed, whichever method
trains and however many threads decode. Seeding per sample, immediately before the draws
and in the thread that draws, is what makes this independent of numba's thread
scheduling.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

_MOD = 2147483647  # 2**31 - 1: keeps every intermediate inside int64 and the seed valid for numpy


class SeededCropFlipDecoder(ResizedCropRGBImageDecoder):
    """Random-resized crop (and horizontal flip) to ``output_size``, seeded per sample.

    ``scale`` and ``ratio`` as in FFCV's ``RandomResizedCropRGBImageDecoder``; ``flip``:
    mirror each image with probability 1/2; ``seed``: the run's seed.
    """

    def __init__(self, output_size: tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (0.75, 4 / 3), flip: bool = False, seed: int = 0):
        super().__init__(output_size)
        self.scale = scale
        self.ratio = ratio
        self.flip = bool(flip)
        self.seed = int(seed) % _MOD

    @property
    def get_crop_generator(self) -> Callable:
        return get_random_crop

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        flip, seed = self.flip, self.seed

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            # One number for the batch's composition: it differs between epochs because
            # the order does, and is the same in every run of the same seed.
            batch_key = np.int64(seed)
            for k in range(len(batch_indices)):
                batch_key = (batch_key * 1000003 + np.int64(batch_indices[k]) + 1) % _MOD
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                np.random.seed((batch_key * 7919 + np.int64(source_ix) * 104729 + seed) % _MOD)
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                if flip and np.random.random() < 0.5:
                    destination[dst_ix] = destination[dst_ix][:, ::-1].copy()
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
