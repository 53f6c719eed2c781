"""Training package: datasets, the PortraitBooth training loop (noise, localization and
identity losses), distributed launch and export to the weight file the nodes load.

It imports the same `portraitbooth_core` modules as the nodes; see issue 7 for the plan.
"""
