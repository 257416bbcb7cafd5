"""The browser studio (index.html and its scripts), shipped as package data and served by `framecast serve`."""
