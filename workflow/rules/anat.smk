# anat stage: see workflow/rules/common.smk for helpers (bpath, units_with, raw_images, STAGE_TARGETS).
