"""Tools around the compiler that measure and explain a model: ``inspection`` (what the
compiler would do with each node), ``evaluate`` (ANN vs SNN accuracy at several T),
``tasks`` (segmentation and detection metrics, ANN vs SNN) and ``report`` (spikes,
synaptic operations, MACs and energy of a compiled SNN). They call the compiler and the
runtime; nothing in the compiler or the runtime calls them."""
