//! Small word lists for generated tasks: RULER-style keys are adjective-noun pairs ("gentle-harbor"); the common
//! words task draws from the same lists; synthetic "coded" words are made from syllables.

use super::Rng;

pub const ADJECTIVES: &[&str] = &[
    "able", "acid", "agile", "amber", "ancient", "angry", "arctic", "ashen", "bald", "barren",
    "bitter", "blank", "bold", "brave", "brief", "bright", "brisk", "broad", "busy", "calm",
    "candid", "careful", "cheap", "chilly", "clean", "clever", "cloudy", "clumsy", "coarse",
    "cold", "cosmic", "cozy", "crisp", "cruel", "curly", "damp", "dark", "dear", "deep", "dense",
    "dizzy", "dry", "dusty", "eager", "early", "easy", "elder", "empty", "equal", "faint", "fair",
    "false", "famous", "fancy", "fast", "fat", "fierce", "filthy", "firm", "flat", "fluffy",
    "fond", "foolish", "fragile", "free", "fresh", "frozen", "funny", "fuzzy", "gentle", "giant",
    "glad", "gloomy", "golden", "grand", "grassy", "greedy", "green", "grumpy", "handy", "happy",
    "hardy", "harsh", "hasty", "heavy", "hidden", "hollow", "honest", "huge", "humble", "hungry",
    "icy", "idle", "jolly", "juicy", "keen", "kind", "large", "lazy", "lean", "little", "lively",
    "lonely", "loud", "lucky", "mellow", "merry", "mighty", "misty", "modern", "moist", "muddy",
    "narrow", "neat", "nervous", "noble", "noisy", "odd", "orange", "pale", "patient", "plain",
    "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "rough", "round", "royal",
    "rusty", "sacred", "salty", "scarce", "shaggy", "sharp", "shiny", "short", "shy", "silent",
    "silly", "sleepy", "slim", "slow", "small", "smooth", "soft", "solid", "sour", "spicy",
    "steady", "steep", "sticky", "stout", "strange", "strong", "sunny", "sweet", "swift", "tall",
    "tame", "tender", "thick", "thin", "tidy", "tiny", "tough", "tricky", "upset", "vast", "vivid",
    "warm", "wary", "weak", "weary", "wet", "wide", "wild", "windy", "wise", "witty", "wooden",
    "young", "zealous",
];

pub const NOUNS: &[&str] = &[
    "acorn",
    "anchor",
    "apple",
    "arrow",
    "badge",
    "bakery",
    "banjo",
    "barn",
    "basket",
    "beach",
    "beacon",
    "bell",
    "bench",
    "berry",
    "bicycle",
    "blanket",
    "boat",
    "bottle",
    "bridge",
    "brook",
    "bucket",
    "cabin",
    "cactus",
    "camel",
    "candle",
    "canyon",
    "carpet",
    "castle",
    "cellar",
    "chair",
    "cherry",
    "chimney",
    "circus",
    "cliff",
    "clock",
    "cloud",
    "comet",
    "compass",
    "cottage",
    "crater",
    "crow",
    "crystal",
    "daisy",
    "desert",
    "diamond",
    "dolphin",
    "donkey",
    "dragon",
    "drum",
    "eagle",
    "engine",
    "falcon",
    "feather",
    "fence",
    "ferry",
    "fiddle",
    "forest",
    "fountain",
    "fox",
    "galaxy",
    "garden",
    "garlic",
    "glacier",
    "goat",
    "guitar",
    "hammer",
    "harbor",
    "harp",
    "hat",
    "hedge",
    "helmet",
    "hill",
    "honey",
    "horse",
    "island",
    "jacket",
    "jungle",
    "kettle",
    "kitten",
    "ladder",
    "lagoon",
    "lantern",
    "lemon",
    "library",
    "lighthouse",
    "lizard",
    "magnet",
    "mango",
    "marble",
    "meadow",
    "mirror",
    "monkey",
    "mountain",
    "mushroom",
    "needle",
    "nest",
    "oasis",
    "ocean",
    "onion",
    "orchard",
    "otter",
    "owl",
    "paddle",
    "palace",
    "panda",
    "parrot",
    "pebble",
    "pencil",
    "pepper",
    "piano",
    "pillow",
    "pirate",
    "planet",
    "pocket",
    "pond",
    "puzzle",
    "quarry",
    "rabbit",
    "radio",
    "raven",
    "ribbon",
    "river",
    "robot",
    "rocket",
    "saddle",
    "sailor",
    "salmon",
    "sandal",
    "scarf",
    "shadow",
    "shell",
    "shovel",
    "sparrow",
    "spider",
    "spoon",
    "squirrel",
    "statue",
    "storm",
    "stove",
    "sugar",
    "summit",
    "swamp",
    "sweater",
    "table",
    "teapot",
    "temple",
    "thimble",
    "thunder",
    "tiger",
    "tomato",
    "tower",
    "tractor",
    "trumpet",
    "tulip",
    "tunnel",
    "turtle",
    "umbrella",
    "valley",
    "violin",
    "volcano",
    "wagon",
    "walrus",
    "wardrobe",
    "whale",
    "whistle",
    "willow",
    "window",
    "wizard",
    "wolf",
    "yacht",
    "zebra",
];

/// A random adjective-noun key such as "gentle-harbor".
pub fn key(rng: &mut Rng) -> String {
    format!("{}-{}", rng.choose(ADJECTIVES), rng.choose(NOUNS))
}

/// `n` distinct keys.
pub fn distinct_keys(rng: &mut Rng, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(n);
    while out.len() < n {
        let k = key(rng);
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// A pronounceable made-up word of `syllables` consonant-vowel pairs ("tobarime").
pub fn coined(rng: &mut Rng, syllables: usize) -> String {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    let mut s = String::with_capacity(syllables * 2);
    for _ in 0..syllables {
        s.push(*rng.choose(C) as char);
        s.push(*rng.choose(V) as char);
    }
    s
}

/// `n` distinct words: real ones from the lists first (shuffled), then coined ones.
pub fn distinct_words(rng: &mut Rng, n: usize) -> Vec<String> {
    let mut pool: Vec<String> = ADJECTIVES
        .iter()
        .chain(NOUNS)
        .map(|s| s.to_string())
        .collect();
    rng.shuffle(&mut pool);
    pool.truncate(n);
    let mut seen: std::collections::HashSet<String> = pool.iter().cloned().collect();
    while pool.len() < n {
        let w = coined(rng, 3);
        if seen.insert(w.clone()) {
            pool.push(w);
        }
    }
    pool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_words_are_distinct() {
        let mut r = Rng::new(5);
        let k = distinct_keys(&mut r, 50);
        let set: std::collections::HashSet<_> = k.iter().collect();
        assert_eq!(set.len(), 50);
        assert!(k.iter().all(|k| k.contains('-')));
        let w = distinct_words(&mut r, 1000);
        let set: std::collections::HashSet<_> = w.iter().collect();
        assert_eq!(set.len(), 1000);
    }
}
