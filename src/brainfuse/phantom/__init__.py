"""The embedded phantom: a synthetic multimodal cohort with known ground truth (``brainfuse demo``).

``generator`` writes the BIDS dataset and truth, ``dicom_export`` its DICOM exports, ``bayes`` the phantom's Bayes
rule. Nothing on the real-data path imports this package (a test checks it): editing the phantom reruns only the
demo jobs.
"""
