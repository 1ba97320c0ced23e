import time

import numpy as np
from PIL import Image

from sdc_runtime import SdcCodec
from sdc_runtime.image import psnr

codec = SdcCodec('models/taef2')
for name in ('kodim03', 'kodim21'):
    img = np.asarray(Image.open(f'/work/shared/data/kodak/{name}.png').convert('RGB'))
    for e in (0, 1, 5):
        t = time.perf_counter(); r = codec.encode_to_size(img, target_bytes=40000, effort=e); dt = time.perf_counter() - t
        print(name, 'effort', e, 'quality', r.quality, len(r.data), 'bytes', round(psnr(img, np.asarray(codec.decode(r.data))), 3), 'dB', round(dt, 1), 's', r.encodes, 'encodes', flush=True)
