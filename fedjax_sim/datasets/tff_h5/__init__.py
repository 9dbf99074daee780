"""TensorFlow Federated's h5 datasets: EMNIST, Shakespeare, StackOverflow and CIFAR-100.

TFF publishes its simulation datasets as HDF5 files with one group per client,
``examples/<client_id>/<feature>``, each feature an array over the client's examples
(``tff.simulation.datasets``; the archives live at `URL_BASE`). This package reads them with
h5py, without TensorFlow, and converts them once into a flat memory-mapped cache
(`fedjax_sim.datasets.cache`): later loads open the cache in well under a second.

Conversion does no Python work per example (beyond joining the byte strings h5py returns):
each client's datasets are read with h5py's low-level API (one read per client and feature,
which bounds the speed), a chunk of clients is concatenated, and the chunk is preprocessed with
whole-array numpy: byte-level character ids (Shakespeare, whose 16k snippets are decoded for
the shared windowing code), a vectorized word split and hashed vocabulary lookup
(StackOverflow, `lookup_words`), a crop and per-image standardization (CIFAR-100). Outputs
are written straight into the cache's memory-mapped ``.npy`` files: converting needs the
output arrays (file pages the OS can write back) plus one chunk of temporaries, never a second
copy of the dataset.

Modules: `files` (the archives, their extraction, the cache), `reader` (the h5 layout, read
client by client in chunks), one per dataset family (`images`: EMNIST and CIFAR-100,
`shakespeare`, `stackoverflow`); the vocabularies are `fedjax_sim.datasets.vocab`'s.

Datasets (sizes as TFF documents them):

* ``tff_emnist`` [1, 2]: handwritten characters by writer; ``only_digits=True`` 3,383 writers,
  341,873 train / 40,832 test examples, 10 classes; ``False`` 3,400 writers, 671,585 / 77,483,
  62 classes. ``x`` float32 ``[28, 28, 1]`` as TFF stores it (1.0 = background), ``y`` int32.
* ``tff_shakespeare`` [1, 3]: 715 speaking roles; snippets become TFF's character ids and
  80-character sequences exactly as `fedjax_sim.datasets.shakespeare` does for the play texts.
* ``tff_stackoverflow`` [4]: 342,477 users, 135,818,730 train examples. ``task="word"``:
  next-word prediction with TFF's 10,000-word vocabulary (pad 0, words 1..10000, OOV 10001,
  BOS 10002, EOS 10003), ``x``/``y`` int32 ``[20]``. ``task="tag"``: the 500 most frequent tags
  of a question from its words (see `load_tff_stackoverflow`).
* ``tff_cifar100`` [4, 5]: 500 train clients (100 images each, Pachinko allocation over the
  label hierarchy) and 100 test clients; TFF's center crop to 24x24 and per-image
  standardization are applied at conversion (train-time random crops and flips are not).

Train and test files list the same clients (except CIFAR-100, whose test clients are other
clients: its test files become the central test set). The per-client test split follows the
training clients' order; a client with no test examples has an empty test split, and clients
found only in the test file (StackOverflow users active only after 2018) are left out, their
count in ``info["test_only_clients"]``.

References:
  [1] Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018, arXiv:1812.01097.
  [2] Cohen et al., "EMNIST: an extension of MNIST to handwritten letters", 2017,
      arXiv:1702.05373.
  [3] McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017, arXiv:1602.05629.
  [4] Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295.
  [5] Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
"""

from fedjax_sim.datasets.tff_h5.files import (
    ARCHIVES,
    FOLDER,
    URL_BASE,
    Archive,
    extract_archive,
    find_file,
)
from fedjax_sim.datasets.tff_h5.images import (
    CIFAR_CROP,
    load_tff_cifar100,
    load_tff_emnist,
    standardize_images,
)
from fedjax_sim.datasets.tff_h5.reader import Feature
from fedjax_sim.datasets.tff_h5.shakespeare import load_tff_shakespeare
from fedjax_sim.datasets.tff_h5.stackoverflow import (
    SO_MAX_TAGS,
    SO_NUM_TAGS,
    SO_SEQUENCE_LENGTH,
    SO_VOCAB_SIZE,
    load_tff_stackoverflow,
    read_tag_counts,
    read_word_counts,
    tag_ids,
    word_sequences,
)

__all__ = [
    "ARCHIVES",
    "CIFAR_CROP",
    "FOLDER",
    "SO_MAX_TAGS",
    "SO_NUM_TAGS",
    "SO_SEQUENCE_LENGTH",
    "SO_VOCAB_SIZE",
    "URL_BASE",
    "Archive",
    "Feature",
    "extract_archive",
    "find_file",
    "load_tff_cifar100",
    "load_tff_emnist",
    "load_tff_shakespeare",
    "load_tff_stackoverflow",
    "read_tag_counts",
    "read_word_counts",
    "standardize_images",
    "tag_ids",
    "word_sequences",
]
