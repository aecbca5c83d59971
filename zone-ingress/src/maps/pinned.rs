//! Opening the agent's pinned maps read-only-in-spirit, after checking that each one has the type
//! and key/value sizes of this build's `#[repr(C)]` layouts. A pin left by an agent of another
//! version is refused with [`MapsError::Layout`] rather than misread.

use std::path::{Path, PathBuf};

use aya::Pod;
use aya::maps::{HashMap, Map, MapData, MapType, PerCpuArray};

use super::error::MapsError;

/// The agent's pin directory, checked to exist.
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(Self {
                dir: dir.to_path_buf(),
            }),
            Ok(_) => Err(MapsError::PinDir {
                dir: dir.to_path_buf(),
                source: std::io::Error::other("not a directory"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(MapsError::PinDirMissing {
                dir: dir.to_path_buf(),
            }),
            Err(source) => Err(MapsError::PinDir {
                dir: dir.to_path_buf(),
                source,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Opens `name` and checks its type and sizes.
    fn checked(
        &self,
        name: &'static str,
        map_type: MapType,
        key_size: usize,
        value_size: usize,
    ) -> Result<Map, MapsError> {
        let path = self.dir.join(name);
        if !path.exists() {
            return Err(MapsError::MapMissing { name, path });
        }
        let open = |e: aya::maps::MapError| MapsError::Open {
            path: path.clone(),
            detail: e.to_string(),
        };
        let data = MapData::from_pin(&path).map_err(open)?;
        let info = data.info().map_err(open)?;
        let layout = |what, expected: String, found: String| MapsError::Layout {
            name,
            path: path.clone(),
            what,
            expected,
            found,
        };
        match info.map_type() {
            Ok(t) if t == map_type => {}
            Ok(t) => {
                return Err(layout(
                    "the map type",
                    format!("{map_type:?}"),
                    format!("{t:?}"),
                ));
            }
            Err(e) => {
                return Err(layout(
                    "the map type",
                    format!("{map_type:?}"),
                    e.to_string(),
                ));
            }
        }
        for (what, expected, found) in [
            ("the key size", key_size, info.key_size()),
            ("the value size", value_size, info.value_size()),
        ] {
            if found as usize != expected {
                return Err(layout(
                    what,
                    format!("{expected} bytes"),
                    format!("{found} bytes"),
                ));
            }
        }
        Map::from_map_data(data).map_err(open)
    }

    pub fn hash<K: Pod, V: Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<MapData, K, V>, MapsError> {
        let map = self.checked(name, MapType::Hash, size_of::<K>(), size_of::<V>())?;
        HashMap::try_from(map).map_err(|e| MapsError::Read {
            name,
            detail: e.to_string(),
        })
    }

    pub fn per_cpu_array<V: Pod>(
        &self,
        name: &'static str,
    ) -> Result<PerCpuArray<MapData, V>, MapsError> {
        let map = self.checked(name, MapType::PerCpuArray, size_of::<u32>(), size_of::<V>())?;
        PerCpuArray::try_from(map).map_err(|e| MapsError::Read {
            name,
            detail: e.to_string(),
        })
    }
}

/// Every entry of a hash map; a key deleted while iterating is skipped (the agent runs on).
pub fn entries<K: Pod, V: Pod>(
    name: &'static str,
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, MapsError> {
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok(kv) => out.push(kv),
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => {
                return Err(MapsError::Read {
                    name,
                    detail: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// A per-CPU array slot summed over the CPUs with `add`.
pub fn per_cpu_sum<V: Pod + Default>(
    name: &'static str,
    map: &PerCpuArray<MapData, V>,
    index: u32,
    add: impl Fn(V, &V) -> V,
) -> Result<V, MapsError> {
    let values = map.get(&index, 0).map_err(|e| MapsError::Read {
        name,
        detail: e.to_string(),
    })?;
    Ok(values.iter().fold(V::default(), add))
}
