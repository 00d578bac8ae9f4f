"""`make napari`: open napari with the bundled noisy sample and the Restore and Fine-tune widgets docked."""

import napari


def main() -> None:
    viewer = napari.Viewer(title="napari-memnet")
    viewer.open_sample("napari-memnet", "noisy_fluorescence")
    viewer.window.add_plugin_dock_widget("napari-memnet", "Restore")
    viewer.window.add_plugin_dock_widget("napari-memnet", "Fine-tune")
    napari.run()


if __name__ == "__main__":
    main()
