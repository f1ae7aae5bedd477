"""apr_training: datasets, training, evaluation and export for apr_localizer models."""
