"""Apparate controller: offline model preparation (``controller.prepare``) and the online control loop."""
