"""Named constants shared by every part of the project (defined once, here)."""

# CIFAR-10 class names in the official label order 0..9 (alphabetical).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# Per-channel RGB mean/std of the official CIFAR-10 training set, on pixel
# values scaled to [0, 1]. The JPEG copy in ../shared agrees within 0.002.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# Input geometry of CIFAR-style data: 32x32 RGB, stored HWC as raw uint8.
IMAGE_SIZE = 32
CHANNELS = 3
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * CHANNELS  # 3,072 bytes per image

# Default size of the held-out validation split carved from train (images).
DEFAULT_VAL_SIZE = 5000

# Exit code for bad input at every entry point (argparse uses 2 as well).
EXIT_BAD_INPUT = 2
