"""The names the command line and the Python API share, in a module without torch so that the
command line's parser (and ``--help``) can list them without loading it."""

#: Per-example metrics of :func:`captum_daam.explain_dataset` and :func:`captum_daam.compare`.
METRICS = ("pointing_game", "energy_pointing_game", "deletion", "insertion",
           "positive_perturbation", "negative_perturbation", "pixel_accuracy", "miou",
           "average_precision", "average_drop", "increase_in_confidence")
#: The metrics that need the dataset's masks.
MASK_METRICS = ("pointing_game", "energy_pointing_game", "pixel_accuracy", "miou",
                "average_precision")
#: The attribution methods named on the command line and in ``compare(methods=[...])``.
METHOD_NAMES = ("daam", "rollout", "gradient-rollout", "legrad", "gradcam",
                "integrated-gradients", "saliency", "input-x-gradient", "occlusion", "random")
