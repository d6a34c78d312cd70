"""Class prototypes and the encoders they live in: convolutional prototype learning (CPL), the
CLIP image encoder and its embedding cache, the encoder learned from the labelled images, and
where CLIP weights are found (torch-free)."""
