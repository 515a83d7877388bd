"""Graph passes, one per module, named ``verb_noun``; ``ann2snn.pipeline`` lists them in order."""
