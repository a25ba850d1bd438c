"""Circuits: transcoder sets, the local replacement model of one prompt, attribution graphs and their JSON."""
