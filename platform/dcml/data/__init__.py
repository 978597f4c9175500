"""The data stage: sources, cleaning, splits, fitted transforms, the validation gate, versions."""
